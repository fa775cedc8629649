"""`hippo bench`: the end-to-end benchmark (HF generate, HF assisted generation, hippo AR,
sequential SD and HIPPO on synthetic agreement pairs) and the benchmark-set runner."""
