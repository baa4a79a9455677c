"""Integrations of fusedloss with other libraries, each in its own module and imported only
when asked for (``import fusedloss`` imports none of them, nor the library they integrate)."""
