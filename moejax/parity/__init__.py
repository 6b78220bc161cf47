"""The comparison library behind `moejax parity`: the tokens compared (tokens), transformers' side (reference,
torch imported lazily), moejax against it (compare: the float32 implementation check and the end-to-end run), what
is accumulated (tally), the bounds and checks (verdict), the report (report), and deliberate faults to measure what
it catches (faults). Routing near ties are proven by moejax.parity.ties."""
