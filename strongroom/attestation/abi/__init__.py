"""Parsing of attestation evidence into immutable typed values (structure only, no signatures)."""
