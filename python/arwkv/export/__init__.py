"""Writing students for other engines: ``gguf`` (llama.cpp's arwkv7 architecture)."""
