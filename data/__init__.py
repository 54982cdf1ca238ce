"""Cell Painting sites: from files on disk to uint16 tensors, plus the synthetic plate generator."""
