"""First rows of Williamson matrices (symmetric circulant A, B, C, D with A² + B² + C² + D² = 4n·I).

Only orders that neither Paley construction nor doubling reaches are listed. These were found for
harpq by computer search (n = 43: sequences invariant under multiplication by the subgroup
{1, 6, 7, 36, 37, 42} of Z_43*, matched by periodic autocorrelation; n = 39: all symmetric sequences
with power spectrum ≤ 4n, pairs matched on summed autocorrelation, row sums 9, 5, 5, 5). The tests
rebuild every matrix and check H Hᵀ = 4n·I exactly.
"""

_ROWS: dict[int, tuple[str, str, str, str]] = {
    39: (
        "-+-+--+-++-++--++++++++++--++-++-+--+-+",
        "-+-+--++++---++--++++++--++---++++--+-+",
        "--+++-+----+++-+++-++-+++-+++----+-+++-",
        "-+---+--++++++-++-+--+-++-++++++--+---+",
    ),
    43: (
        "+++++-++----+-++--++-++-++--++-+----++-++++",
        "+++---++--+-+-+-++--------++-+-+-+--++---++",
        "++-+-++++-+--+--+++--++--+++--+--+-++++-+-+",
        "+-++-----++++-+-+++-++++-+++-+-++++-----++-",
    ),
}

WILLIAMSON: dict[int, tuple[list[int], ...]] = {
    n: tuple([1 if c == "+" else -1 for c in row] for row in rows) for n, rows in _ROWS.items()
}
