"""Supervised bioactivity baseline on well profiles (the paper's hti-cnn FNN); see supervised_baseline/README.md."""
