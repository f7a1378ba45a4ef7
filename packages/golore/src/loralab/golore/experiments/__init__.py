"""Reproductions of the GoLore paper's experiments (run as ``python -m loralab.golore.experiments.<name>``)."""
