//! One module per subcommand family.
pub mod agent;
pub mod bundle;
pub mod bundles;
pub mod capture;
pub mod compile;
pub mod datasets;
pub mod demo;
pub mod devices;
pub mod drift;
pub mod experiments;
pub mod jobs;
pub mod keygen;
pub mod rollouts;
pub mod serve;
pub mod table;
pub mod train;
pub mod worker;
