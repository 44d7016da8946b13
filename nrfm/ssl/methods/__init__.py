"""One module per self-supervised method; each defines one :class:`~nrfm.ssl.base.SSLMethod` subclass decorated
with :func:`~nrfm.ssl.registry.register`. The module's name is the method's name in configs and CSVs."""
