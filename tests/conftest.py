"""Settings shared by the whole test suite."""

import torch

# The tests push tiny tensors (2-D mixtures, tiny random models) through many small ops, where the
# thread pool's hand-offs cost more than they save: on the 2-core machine, with another job running,
# two threads made parity checks 30-100x slower (measured per test file). One thread for all tests.
torch.set_num_threads(1)
