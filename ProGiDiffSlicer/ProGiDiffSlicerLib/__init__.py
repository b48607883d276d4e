"""Slicer-side helpers of the ProGiDiff module. Only ``mrml_io`` imports slicer/MRML;
everything else is plain Python, tested with pytest outside Slicer."""
