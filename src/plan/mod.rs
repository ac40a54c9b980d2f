//! The planner: the seed's strategy table and the copy lists transfers become.

pub mod copy_list;
mod strategy;

pub use copy_list::{CopyOp, Request};
pub use strategy::{Capabilities, Location, Plan, Strategy, select};
