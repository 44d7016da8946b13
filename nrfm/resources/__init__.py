"""Package data: the notebooks and configs, copied from the checkout's notebooks/ and configs/ when a wheel is built."""
