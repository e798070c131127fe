"""One module per analysis, each with one public verb taking ``(net, input, ...)``."""
