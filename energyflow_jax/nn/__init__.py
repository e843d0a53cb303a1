"""Neural-network building blocks: CPU-fast conv kernels, layers, a plain MLP."""
