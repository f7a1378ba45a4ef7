"""loralab.golore: GoLore/GaLore. The public API lives here and nothing else."""

__version__ = "0.1.0"
__all__: list[str] = []
