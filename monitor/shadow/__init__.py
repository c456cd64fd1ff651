"""Shadow evaluation: a candidate model beside the live one, never published (issue 14)."""
