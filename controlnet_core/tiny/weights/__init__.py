"""The shipped demo models (fp16 safetensors), trained by `controlnet_core.tiny.train` (docs/training.md):

* `autoencoder.safetensors`     the tiny image autoencoder (128 px RGB <-> 4 x 16 x 16 latent)
* `base_unet.safetensors`       the tiny base UNet (LDM key names, config in the metadata)
* `text_encoder.safetensors`    the tiny text encoder (fixed vocabulary)
* `controlnet_canny.safetensors` the Canny ControlNet, original ControlNet key layout
"""
