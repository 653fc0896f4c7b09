"""The write side: options, plan, statistics pass, coefficients pass, convert, append."""
