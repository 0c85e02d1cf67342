"""Spherical k-means on patch features: centroids are unit vectors, assignment is by cosine.

Everything here is *spherical* k-means: feature rows are L2-normalised before they are clustered,
centroids are unit vectors, a row goes to the centroid of highest cosine (= nearest in L2, since
both are unit length), a centroid is the normalised mean (= normalised sum) of its rows, and the
objective ("inertia") is the sum over rows of 1 - cosine to the assigned centroid (half the squared
L2 distance). The fit engines, the block-wise Lloyd step (`lloyd_partial` + `lloyd_update`, which
`ray_jobs.distributed_lloyd` maps over Parquet shards;
`core.clustering.lloyd`) and `inertia` all use these definitions.
"""
