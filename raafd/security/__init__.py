"""Abuse resistance that is not a transport: rate limits (:mod:`raafd.security.limits`), JWT
verification (:mod:`raafd.security.jwt`) and the permission policy
(:mod:`raafd.security.policy`). Pure where it can be: every rule here is a function of
(state, event, now), tested with exact times; the transports call it at their edges."""
