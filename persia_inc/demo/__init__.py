"""`persia-inc demo`: the whole pipeline on one machine, verified byte for byte.

A CTR model trains on synthetic Criteo-shaped data with the producer hook; packets go to
storage; the loader applies them to two embedding-server processes that started from an
initial sparse checkpoint; at the end every row on the servers must equal the training table.
"""

from persia_inc.demo.pipeline import DemoOptions, DemoReport, run_demo

__all__ = ["DemoOptions", "DemoReport", "run_demo"]
