"""Sources: where frames come from (a watched folder, a camera stream, the simulator)."""

from monitor.sources.base import FrameItem, FrameSink, Source
from monitor.sources.folder import FolderSource, frame_time_from_name

__all__ = ["FolderSource", "FrameItem", "FrameSink", "Source", "frame_time_from_name"]
