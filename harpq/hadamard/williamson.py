"""First rows of Williamson matrices (symmetric circulant A, B, C, D with A² + B² + C² + D² = 4n·I).

Only orders that neither Paley construction nor doubling reaches are listed here.
"""

WILLIAMSON: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
