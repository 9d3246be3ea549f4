"""The bundled demo model family: the shapes data set and the training of its LlamaGen models."""
