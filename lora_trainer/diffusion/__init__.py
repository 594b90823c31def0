"""Stable Diffusion facts as data and math, with no model code: the family table and the
noise schedule / target / loss-weighting math both the backbones and the loop use."""
