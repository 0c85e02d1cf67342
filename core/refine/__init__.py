"""CLUSTSEG-style refinement: recurrent cross-attention run as parameter-free EM clustering.

CLUSTSEG (Liang et al.) treats segment queries as cluster centres. A "recurrent cross-attention"
layer runs T rounds of
    E-step  A = softmax over the cluster axis of (X C^T / tau)      (N, K) soft assignment
    M-step  C = column-normalised A^T X (attention-weighted means)   (K, D)
with no learnt parameters, and the centres are initialised per task ("Dreamy-Start"). Here X is
a frozen feature map (no network is trained), so each mode is plain EM at test time:

- **semantic** (Dreamy-Start = class centres): the seeds are the global k-means centroids
  (k ~ 300); EM adapts them to one image's patch features and the cluster -> class mapping is
  kept. `refine_semantic` returns the refined centroids (unit rows, usable wherever the global
  ones are: `core.labelling.assign.PixelAssigner` labels the image with them). T = 0 gives back the
  centroids bit for bit, so the labels equal the baseline exactly.
- **thing** (Dreamy-Start = seeds emerging from the image): `split_things` replaces connected
  components of thing classes by EM. Each connected region of a thing class is clustered on
  z = [unit feature, pos_weight * (y, x) / long side]; the seeds are picked in the image itself by
  farthest-point sampling, and an instance exists only where the image gives evidence for it
  (see `split_things`).
- **superpixel** (Dreamy-Start = grid seeds): `superpixels` runs EM on
  z = [feature, colour, position] with one seed per grid cell, each pixel attending only to the
  3 x 3 cells around its own (as SSN / SLIC), and `refine_labels_by_superpixels` gives each
  superpixel the argmax of its mean class logit (or its majority trainId): a boundary-aware
  alternative to the dense CRF.

Objective (what EM does not increase)
-------------------------------------
cosine (semantic mode; features and centres L2-normalised as in `core.clustering`): the E-step
softmax(x.c / tau) over unit centres is the posterior of a mixture of von Mises-Fisher laws
with equal weights and one concentration 1/tau. Its free energy
    F(A, C) = sum_nk A_nk (-x_n.c_k / tau + log A_nk) - (m0 / tau) sum_k c_k.a_k
is minimised over A by the softmax, giving
    L(C) = tau * min_A F = -tau * sum_n logsumexp_k(x_n.c_k / tau) - m0 * sum_k c_k.a_k,
and over unit c_k by c_k = normalise(sum_n A_nk x_n + m0 a_k). So the M-step must renormalise
the centres: the attention-weighted *mean* (norm <= 1) is not the minimiser over the sphere and
does not decrease L in general, while the renormalised mean (same direction) does; EM is then
coordinate descent on F and L(C_t) never increases. (a_k = anchor, the initial centre; m0 =
prior_mass, 0 by default = the parameter-free CLUSTSEG update; m0 > 0 is the MAP update with a
vMF prior around the global centre, which keeps clusters barely present in the image close to it.)

euclidean (thing and superpixel modes, where positions and colours are not directions): the
E-step is softmax(-||x - c||^2 / (2 tau)) (identical to the cosine one when x and c are unit),
the M-step the plain weighted mean (sum A x + m0 a) / (sum A + m0), and the objective the
negative log-likelihood of an isotropic Gaussian mixture with variance tau:
    L(C) = -tau * sum_n logsumexp_k(-||x_n - c_k||^2 / (2 tau)) + (m0 / 2) sum_k ||c_k - a_k||^2.

A cluster with attention mass below `min_mass` (or a frozen one) keeps its previous centre: F is
a sum of per-cluster terms once A is fixed, so keeping one centre is still a descent step
(generalised EM) and no 0/0 can occur.

Everything here is vectorised (matrix products, bincount, slice adds); the only Python loops run
over EM iterations, regions, seeds, neighbour offsets or classes, never over pixels.
"""
