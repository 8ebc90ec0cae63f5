"""The data layer: torch only, on the core. A corpus read and checked, its prepared ids (a memory-mapped cache),
and the windows and streams cut from them."""
