"""lwjax's compiler passes (installed as ``lwjax.passes``): trace -> segment -> footprint ->
cost -> partition -> lower. Each pass is a pure function returning a frozen dataclass."""
