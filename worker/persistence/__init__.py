"""Apps-Engine persistence made safe for a cluster: records, associations, units of work.

``associations`` names what records are about, ``unit`` tracks one transaction's reads and
staged writes, ``accessors`` are what handlers see, ``store`` is the only module that speaks
SQL, ``schema`` and ``migrations`` define the tables.
"""
