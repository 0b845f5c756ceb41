"""aenet's file formats, one module per format (readers, writers and their checks; no model code)."""
