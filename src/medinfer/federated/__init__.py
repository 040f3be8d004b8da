"""medinfer.federated: federated analysis nodes (docs/federated.md).

- :mod:`medinfer.federated.archive`: safe unpacking of untrusted payloads (TAR, zip);
- :mod:`medinfer.federated.analyzer`: one analysis round, bytes in, DICOM SEG / NIfTI out;
- :mod:`medinfer.federated.star`: FLAME STAR ``NnUNetAnalyzer``, ``PassThroughAggregator``,
  ``main()``;
- :mod:`medinfer.federated.flower`: federated evaluation on Flower (extra ``federated``);
- :mod:`medinfer.federated.cli`: ``medinfer federated run-local | evaluate``.

Nothing heavy is imported here.
"""
