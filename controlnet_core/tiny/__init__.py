"""The demo world: tiny models trained by our own code on procedural shapes, and the demo command.

Kept apart from the core (which never imports it): `train` (training CLI), `data` (procedural
shapes and captions, edge F1), `drawn` (drawing-like training scenes and user-style drawings),
`evaluate` (the fixed held-out evaluation: edge F1 and colour score), `text` (tiny text encoder),
`latent` (tiny autoencoder), `demo` (the `demo` command), `sheet` (labelled image grids),
`weights/` (the shipped fp16 models).
"""
