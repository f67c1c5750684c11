"""The federation's certificates: the CA (TLS and enrolment certificates, the CRL) and its
on-disk state."""
