"""Local OCI image store, layer unpacking and image recipes."""
