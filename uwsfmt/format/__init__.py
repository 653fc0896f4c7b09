"""The UWS format itself: naming, logical dtypes, the manifest schema."""
