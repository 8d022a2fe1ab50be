"""Item pictures, below both services: the safe loader of untrusted image URIs (`loader`) and
the thumbnails the worker stores with each item and the page serves (`thumbnails`)."""
