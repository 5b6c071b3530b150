"""Examples in: a hub id, a local file or `synthetic:N`, validated row by row and split by question
hash (`loading`), the synthetic generator (`synthetic`), and `sqltune data` (`cli`)."""
