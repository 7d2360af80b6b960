"""CuPy backend of segloss (see plugin.py)."""
