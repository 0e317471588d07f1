"""Machine rules: from signals and MES order events to the milestones ERP and QMS can use.

`machine.MachineRule` is one machine's rule, assembled from parts that each own one concern and
build on `core.RuleCore` (the configuration, the state, the event builder): `counters` (units
and confirmations), `orders` (binding, start, completion), `packml` (machine states, operations,
downtime) and `limits` (process limits). `state` is the rule's state as plain data; `mes` holds
the MES order messages that bind and unbind orders.
"""
