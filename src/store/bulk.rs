//! Statements about many rows whose text does not depend on how many rows there are.
//!
//! sea-orm writes `INSERT ... VALUES (...), (...)` and `col IN ($1, $2, ...)`: one statement
//! text per number of rows. On PostgreSQL each text is parsed and planned anew (a 16-row insert
//! of a 14-column table: 1.30 ms unprepared against 0.54 ms prepared, `pgbench -M simple` against
//! `-M prepared`), and once a connection has seen more texts than sqlx's statement cache holds
//! (100), prepared again in an extra round trip. Intake's batches and the relay's rounds vary in
//! size all the time, so that was most of their statements' cost (docs/benchmarks.md, "Third
//! round").
//!
//! On PostgreSQL, the rows (or the values) therefore travel as one JSONB parameter:
//! - [`insert`]: a JSON array of objects keyed by column name, turned back into rows of the
//!   table's own type by `jsonb_populate_recordset(NULL::table, $1)`, so every column's type
//!   and conversion is the table's own;
//! - [`one_of`]: `col = ANY(ARRAY(SELECT jsonb_array_elements_text($1)::type))`, which the
//!   planner answers with an index scan like an `IN` list (the array is computed once, first).
//!
//! One text per table and question, prepared once per connection and planned generically.
//! SQLite prepares statements in-process for next to nothing; it keeps sea-orm's statements.

use chrono::SecondsFormat;
use sea_orm::sea_query::{Expr, SimpleExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityName, EntityTrait,
    Iden, Iterable, PrimaryKeyTrait, Statement, Value,
};
use serde_json::Value as Json;

/// The rows `rows` inserted in one statement; with `returning_ids`, their ids (`id` column) in
/// increasing order, which is the order of the rows: both databases hand out the ids of one
/// multi-row insert in the order of its rows (the order `RETURNING` lists them in is not
/// promised, hence the sort). Every row must set the same columns.
pub async fn insert<A>(
    db: &impl ConnectionTrait,
    rows: Vec<A>,
    returning_ids: bool,
) -> Result<Vec<i64>, DbErr>
where
    A: ActiveModelTrait + Send,
    <A::Entity as EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
    <<A::Entity as EntityTrait>::PrimaryKey as PrimaryKeyTrait>::ValueType: Into<i64>,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    if db.get_database_backend() != DbBackend::Postgres {
        // SQLite: sea-orm's multi-row `INSERT ... VALUES`.
        let insert = A::Entity::insert_many(rows);
        if !returning_ids {
            insert.exec_without_returning(db).await?;
            return Ok(Vec::new());
        }
        let mut ids: Vec<i64> = insert
            .exec_with_returning_keys(db)
            .await?
            .into_iter()
            .map(Into::into)
            .collect();
        ids.sort_unstable();
        return Ok(ids);
    }
    let (columns, parameter) = as_json_rows(&rows)?;
    let table = quoted(A::Entity::default().table_name());
    let names = column_list(&columns, "");
    let returning = if returning_ids {
        " RETURNING \"id\""
    } else {
        ""
    };
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "INSERT INTO {table} ({names}) SELECT {names} FROM jsonb_populate_recordset(NULL::{table}, $1){returning}"
        ),
        [parameter],
    );
    if !returning_ids {
        db.execute_raw(statement).await?;
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(rows.len());
    for row in db.query_all_raw(statement).await? {
        ids.push(row.try_get::<i64>("", "id")?);
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The rows `rows` inserted in one statement, those that would duplicate a row already there on
/// `conflict_columns` (a unique key) left out.
pub async fn insert_unless_present<A>(
    db: &impl ConnectionTrait,
    rows: Vec<A>,
    conflict_columns: &[<A::Entity as EntityTrait>::Column],
) -> Result<(), DbErr>
where
    A: ActiveModelTrait + Send,
    <A::Entity as EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
{
    if rows.is_empty() {
        return Ok(());
    }
    if db.get_database_backend() != DbBackend::Postgres {
        A::Entity::insert_many(rows)
            .on_conflict_do_nothing_on(conflict_columns.iter().copied())
            .exec_without_returning(db)
            .await?;
        return Ok(());
    }
    let (columns, parameter) = as_json_rows(&rows)?;
    let table = quoted(A::Entity::default().table_name());
    let names = column_list(&columns, "");
    let key = column_list(conflict_columns, "");
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "INSERT INTO {table} ({names}) SELECT {names} FROM jsonb_populate_recordset(NULL::{table}, $1) \
             ON CONFLICT ({key}) DO NOTHING"
        ),
        [parameter],
    ))
    .await?;
    Ok(())
}

/// Existing rows replaced by `rows` (matched on `id`, every column of the model written), in
/// one statement.
pub async fn update_by_id<A>(db: &impl ConnectionTrait, rows: Vec<A>) -> Result<(), DbErr>
where
    A: ActiveModelTrait + Send,
    <A::Entity as EntityTrait>::Model: sea_orm::IntoActiveModel<A>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let id = <A::Entity as EntityTrait>::Column::iter()
        .find(|column| column.unquoted() == "id")
        .ok_or_else(|| DbErr::Custom("update_by_id: the table has no id column".to_owned()))?;
    if db.get_database_backend() != DbBackend::Postgres {
        // An upsert on the primary key updates them all.
        let columns = <A::Entity as EntityTrait>::Column::iter().filter(|c| c.unquoted() != "id");
        A::Entity::insert_many(rows)
            .on_conflict(
                sea_orm::sea_query::OnConflict::column(id)
                    .update_columns(columns)
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await?;
        return Ok(());
    }
    let (columns, parameter) = as_json_rows(&rows)?;
    let changed: Vec<_> = columns
        .into_iter()
        .filter(|c| c.unquoted() != "id")
        .collect();
    let table = quoted(A::Entity::default().table_name());
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "UPDATE {table} SET ({}) = ROW({}) FROM jsonb_populate_recordset(NULL::{table}, $1) AS row_ \
             WHERE {table}.\"id\" = row_.\"id\" AND {table}.\"id\" = ANY({IDS_OF_ROWS})",
            column_list(&changed, ""),
            column_list(&changed, "row_."),
        ),
        [parameter],
    ))
    .await?;
    Ok(())
}

/// The ids of the rows of the parameter, as an array computed before the rest of the statement.
/// Joined with a set-returning function alone, a table is read whole: the planner assumes the
/// function returns 100 rows and prefers a hash join over a sequential scan (3.8 ms for two rows
/// of a 20,000-row table, `EXPLAIN ANALYZE`); with `id = ANY(array)` it looks the rows up by their
/// primary key (0.3 ms), however the plan is cached.
const IDS_OF_ROWS: &str =
    "ARRAY(SELECT (row_->>'id')::bigint FROM jsonb_array_elements($1) AS row_)";

/// The columns the first row sets, and every row as a JSON object keyed by those columns' names,
/// all in one JSONB array: the single parameter of the statements above.
fn as_json_rows<A: ActiveModelTrait>(rows: &[A]) -> Result<(Columns<A>, Value), DbErr> {
    let columns: Columns<A> = <A::Entity as EntityTrait>::Column::iter()
        .filter(|column| rows.first().is_some_and(|row| !row.is_not_set(*column)))
        .collect();
    let mut array = Vec::with_capacity(rows.len());
    for row in rows {
        let mut object = serde_json::Map::with_capacity(columns.len());
        for column in &columns {
            let value = row.get(*column).into_value().ok_or_else(|| {
                DbErr::Custom(format!(
                    "bulk statement on {}: column {} set in the first row only",
                    A::Entity::default().table_name(),
                    column.unquoted()
                ))
            })?;
            object.insert(column.unquoted().to_owned(), json_of(value)?);
        }
        array.push(Json::Object(object));
    }
    Ok((columns, Value::Json(Some(Box::new(Json::Array(array))))))
}

type Columns<A> = Vec<<<A as ActiveModelTrait>::Entity as EntityTrait>::Column>;

/// `"a", "b"`, each name after `prefix`.
fn column_list<C: Iden>(columns: &[C], prefix: &str) -> String {
    columns
        .iter()
        .map(|column| format!("{prefix}{}", quoted(column.unquoted())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The element type `one_of` casts its values to on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub enum Elements {
    BigInt,
    Text,
    Uuid,
}

/// `column IN (values)`, written on PostgreSQL as one fixed text whatever the number of values
/// (see the module documentation). `column` is the column's name as the query refers to it.
pub fn one_of<C, V>(backend: DbBackend, column: C, elements: Elements, values: V) -> SimpleExpr
where
    C: ColumnTrait,
    V: IntoIterator,
    V::Item: Into<Value>,
{
    let values: Vec<Value> = values.into_iter().map(Into::into).collect();
    if backend != DbBackend::Postgres {
        return column.is_in(values);
    }
    let array: Vec<Json> = values
        .into_iter()
        .map(|value| json_of(value).unwrap_or(Json::Null))
        .collect();
    let cast = match elements {
        Elements::BigInt => "bigint",
        Elements::Text => "text",
        Elements::Uuid => "uuid",
    };
    let name = format!(
        "{}.{}",
        quoted(C::EntityName::default().table_name()),
        quoted(column.unquoted())
    );
    Expr::cust_with_values(
        format!("{name} = ANY(ARRAY(SELECT jsonb_array_elements_text($1)::{cast}))"),
        [Value::Json(Some(Box::new(Json::Array(array))))],
    )
}

/// A value as `jsonb_populate_recordset` reads it back into its column's type: timestamps as
/// RFC 3339 with microseconds (what PostgreSQL keeps, truncated as sqlx's binary encoding does),
/// UUIDs as text, JSON as itself.
/// Takes the value: the row's copy of a KCI's body moves into the JSON, not copied again.
fn json_of(value: Value) -> Result<Json, DbErr> {
    Ok(match value {
        Value::Bool(v) => v.map_or(Json::Null, Json::Bool),
        Value::TinyInt(v) => v.map_or(Json::Null, Json::from),
        Value::SmallInt(v) => v.map_or(Json::Null, Json::from),
        Value::Int(v) => v.map_or(Json::Null, Json::from),
        Value::BigInt(v) => v.map_or(Json::Null, Json::from),
        Value::TinyUnsigned(v) => v.map_or(Json::Null, Json::from),
        Value::SmallUnsigned(v) => v.map_or(Json::Null, Json::from),
        Value::Unsigned(v) => v.map_or(Json::Null, Json::from),
        Value::BigUnsigned(v) => v.map_or(Json::Null, Json::from),
        Value::String(v) => v.map_or(Json::Null, Json::String),
        Value::Json(v) => v.map_or(Json::Null, |json| *json),
        Value::Uuid(v) => v.map_or(Json::Null, |uuid| Json::String(uuid.to_string())),
        Value::ChronoDateTimeUtc(v) => v.map_or(Json::Null, |at| {
            Json::String(at.to_rfc3339_opts(SecondsFormat::Micros, true))
        }),
        Value::ChronoDateTimeWithTimeZone(v) => v.map_or(Json::Null, |at| {
            Json::String(at.to_rfc3339_opts(SecondsFormat::Micros, true))
        }),
        other => {
            return Err(DbErr::Custom(format!(
                "a value of a type the bulk statements do not carry: {other:?}"
            )));
        }
    })
}

fn quoted(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_microseconds_and_truncate_below() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-25T01:02:03.123456789Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(
            json_of(Value::from(at)).unwrap(),
            Json::String("2026-11-25T01:02:03.123456Z".to_owned())
        );
    }

    #[test]
    fn nulls_stay_null_and_json_stays_itself() {
        assert_eq!(json_of(Value::String(None)).unwrap(), Json::Null);
        let document = serde_json::json!({"a": [1, "\u{1F600}"]});
        assert_eq!(json_of(Value::from(document.clone())).unwrap(), document);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quoted("kci"), "\"kci\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
