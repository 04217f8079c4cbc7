"""Suite-wide test settings.

One intra-op thread: the tests run many small tensor operations, and on a 2-core machine that is
busy with anything else two threads spin-wait on each other (measured here: tiny forwards 9x
slower, the sampler 20x slower). One thread is never much slower for these sizes.
"""

import torch

torch.set_num_threads(1)
