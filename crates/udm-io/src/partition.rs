//! MBR and GPT partition tables (placeholder until the io-backends work lands).
