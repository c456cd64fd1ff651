"""The two particle classes the simulator draws, named as in the public dataset.

CEX is cephalexin, the product (needle bundles); PG is phenylglycine, the impurity
(granular agglomerates). The strings double as ImageFolder directory names.
"""

from __future__ import annotations

from typing import Final

CEX: Final = "CEX"
PG: Final = "PG"
LABELS: Final = (CEX, PG)
