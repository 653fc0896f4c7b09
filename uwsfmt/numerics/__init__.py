"""Pure tensor math: Gram/sketch linear algebra, rate-distortion budgets, the native kernel."""
