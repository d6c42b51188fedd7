"""One module per benchmark row; each exposes ``run(ctx) -> dict`` (figures plus ``ratios``)."""
