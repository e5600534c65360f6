"""Image-set metrics without Ray: FID feature extractors (torch-fidelity's registry) and mergeable
feature statistics with the reference `.npz` files they are kept in."""
