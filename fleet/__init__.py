"""The fleet's shared rules, between the services and the network core: the routing policy
and A/B experiments as the fleet config holds them, and roll-outs of model sets. The edge,
the console and the `hybridgen fleet` command read and write them through the same code.
Pure or bus-only: no model runtime."""
