"""The masked round's messages and mathematics, shared by server and node (SecAgg, Bonawitz et
al., CCS 2017, §4 and §6): canonical encodings, enrolments and rosters, commits, the chain hash,
and the double masks inside the ciphertexts."""
