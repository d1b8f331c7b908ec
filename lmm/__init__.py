"""lmm: a local chat whose memory lives inside the model.

A memory module rewrites the hidden states of one middle transformer layer, learns
online from the tokens of the user's messages that surprised the model, and is saved
per user as a safetensors file. See README.md for the tour of the package.
"""

__version__ = "0.1.0"
