"""Each pipeline stage as one function that builds and runs a Ray Data plan (or, for the fit,
driver work). The Ray-free core does the computing; these functions only wire it together."""
