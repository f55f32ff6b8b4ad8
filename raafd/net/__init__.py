"""Moving a feed's events to clients: :mod:`raafd.net.delivery`, one delivery for every feed and
every transport."""
