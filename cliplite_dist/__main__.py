"""`python -m cliplite_dist RECIPE [key=value ...]`, the form torchrun takes:
`torchrun --nproc_per_node 8 -m cliplite_dist recipes/cc3m-vitb32.yaml`."""
from cliplite_dist.cli import train_main

train_main()
