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
//! On PostgreSQL, the rows (or the values) therefore travel as one JSON parameter:
//! - [`insert`]: a JSON array of objects keyed by column name, turned back into rows of the
//!   table's own type by `jsonb_populate_recordset(NULL::table, $1::jsonb)`, so every column's
//!   type and conversion is the table's own;
//! - [`one_of`]: `col = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)::type))`, which the
//!   planner answers with an index scan like an `IN` list (the array is computed once, first).
//!
//! The JSON is written as text straight from the rows' values ([`as_json_rows`]), not built as a
//! `serde_json::Value` tree: sea-orm copies every parameter before binding it, and a tree is
//! copied node by node (one allocation per string), a text in one piece. Each such parameter
//! appears once in its statement, so PostgreSQL parses it once (`::jsonb`).
//!
//! One text per table and question, prepared once per connection and planned generically.
//!
//! SQLite takes the same JSON parameter, read by its own JSON functions (3.45 or later, bundled):
//! - rows: `INSERT ... SELECT row_.value ->> 'column', ... FROM jsonb_each(?) AS row_`, each
//!   value written as sqlx would bind it (timestamps in sqlx's RFC 3339 text, JSON as its text,
//!   UUIDs as hex that `unhex` turns into sqlx's 16-byte blob), so that what is stored is byte for
//!   byte what sea-orm's own insert stores;
//! - values: `column IN (SELECT value FROM json_each(?))`, answered through the column's index.
//!
//! Preparing is in-process there, but not free: with sea-orm's texts, one per row count, SQLite's
//! parser was the largest part of intake's writes, and each connection's cache of compiled
//! statements held a copy of every size (docs/benchmarks.md, "Eleventh round").

use chrono::SecondsFormat;
use sea_orm::sea_query::{ColumnType, Expr, SimpleExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityName, EntityTrait,
    Iden, Iterable, PrimaryKeyTrait, Statement, Value,
};

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
    let backend = db.get_database_backend();
    let count = rows.len();
    let (columns, parameter) = as_json_rows(rows, backend)?;
    let returning = if returning_ids {
        " RETURNING \"id\""
    } else {
        ""
    };
    let statement = Statement::from_sql_and_values(
        backend,
        format!(
            "{}{returning}",
            insert_sql::<A>(backend, &columns, &placeholder(backend, 1))
        ),
        [parameter],
    );
    if !returning_ids {
        db.execute_raw(statement).await?;
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(count);
    for row in db.query_all_raw(statement).await? {
        ids.push(row.try_get::<i64>("", "id")?);
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The placeholder of parameter number `n` in a statement of its own.
fn placeholder(backend: DbBackend, n: usize) -> String {
    match backend {
        DbBackend::Postgres => format!("${n}"),
        _ => format!("?{n}"),
    }
}

/// `INSERT INTO table (columns) SELECT ...` of the rows in the JSON parameter `parameter` (its
/// placeholder; [`as_json_rows`]), in the order of the rows.
fn insert_sql<A: ActiveModelTrait>(
    backend: DbBackend,
    columns: &Columns<A>,
    parameter: &str,
) -> String {
    let table = quoted(A::Entity::default().table_name());
    let names = column_list(columns, "");
    if backend == DbBackend::Postgres {
        format!(
            "INSERT INTO {table} ({names}) SELECT {names} FROM jsonb_populate_recordset(NULL::{table}, {parameter}::jsonb)"
        )
    } else {
        let mut values = String::with_capacity(columns.len() * 40);
        for (n, column) in columns.iter().enumerate() {
            if n > 0 {
                values.push_str(", ");
            }
            values.push_str(&sqlite_row_value(*column));
        }
        // `WHERE true`: an upsert clause may follow (SQLite's parser would take its `ON` for a
        // join's).
        format!(
            "INSERT INTO {table} ({names}) SELECT {values} FROM jsonb_each({parameter}) AS row_ WHERE true ORDER BY row_.key"
        )
    }
}

/// SQLite: a column's value in a row of `jsonb_each` (`row_`), as sqlx would have bound it
/// ([`write_value`] writes UUIDs as hex for `unhex`).
fn sqlite_row_value<C: ColumnTrait>(column: C) -> String {
    let value = format!("row_.value ->> '{}'", column.unquoted().replace('\'', "''"));
    match column.def().get_column_type() {
        ColumnType::Uuid => format!("unhex({value})"),
        _ => value,
    }
}

/// The rows `rows` inserted in one statement, and read back as stored (defaults applied, JSON
/// as the database keeps it), in the order of the rows (`id_of`: a row's id, which both
/// databases hand out in row order). Every row must set the same columns.
pub async fn insert_returning<A>(
    db: &impl ConnectionTrait,
    rows: Vec<A>,
    id_of: impl Fn(&<A::Entity as EntityTrait>::Model) -> i64,
) -> Result<Vec<<A::Entity as EntityTrait>::Model>, DbErr>
where
    A: ActiveModelTrait + Send,
    <A::Entity as EntityTrait>::Model: sea_orm::IntoActiveModel<A> + sea_orm::FromQueryResult,
{
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    let count = rows.len();
    let (columns, parameter) = as_json_rows(rows, backend)?;
    let statement = Statement::from_sql_and_values(
        backend,
        format!(
            "{} RETURNING *",
            insert_sql::<A>(backend, &columns, &placeholder(backend, 1))
        ),
        [parameter],
    );
    let mut stored = Vec::with_capacity(count);
    for row in db.query_all_raw(statement).await? {
        stored.push(
            <<A::Entity as EntityTrait>::Model as sea_orm::FromQueryResult>::from_query_result(
                &row, "",
            )?,
        );
    }
    stored.sort_by_key(|model| id_of(model));
    Ok(stored)
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
    let backend = db.get_database_backend();
    let (sql, parameter) = insert_unless_present_sql(backend, rows, conflict_columns, 1)?;
    db.execute_raw(Statement::from_sql_and_values(backend, sql, [parameter]))
        .await?;
    Ok(())
}

/// [`insert_unless_present`]'s statement, its rows in parameter number `parameter`, and that
/// parameter's value: on PostgreSQL, to be part of a larger statement (with `RETURNING`, a
/// `WITH`).
pub fn insert_unless_present_sql<A>(
    backend: DbBackend,
    rows: Vec<A>,
    conflict_columns: &[<A::Entity as EntityTrait>::Column],
    parameter: usize,
) -> Result<(String, Value), DbErr>
where
    A: ActiveModelTrait,
{
    let (columns, value) = as_json_rows(rows, backend)?;
    let key = column_list(conflict_columns, "");
    Ok((
        format!(
            "{} ON CONFLICT ({key}) DO NOTHING",
            insert_sql::<A>(backend, &columns, &placeholder(backend, parameter))
        ),
        value,
    ))
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
    let backend = db.get_database_backend();
    if backend != DbBackend::Postgres {
        let (columns, parameter) = as_json_rows(rows, backend)?;
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            sqlite_upsert_by_id_sql::<A>(&columns, "?1")?,
            [parameter],
        ))
        .await?;
        return Ok(());
    }
    let ids = ids_of_rows(&rows)?;
    let (columns, parameter) = as_json_rows(rows, backend)?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        update_by_id_sql::<A>(&columns, "$1", "$2"),
        [parameter, ids],
    ))
    .await?;
    Ok(())
}

/// SQLite: [`update_by_id`]'s statement, the rows in JSON parameter number `parameter`: an
/// upsert on the primary key, which updates them all.
fn sqlite_upsert_by_id_sql<A: ActiveModelTrait>(
    columns: &Columns<A>,
    parameter: &str,
) -> Result<String, DbErr> {
    let id = id_column::<A>()?;
    let mut sql = insert_sql::<A>(DbBackend::Sqlite, columns, parameter);
    sql.push_str(" ON CONFLICT (");
    push_quoted(&mut sql, id.unquoted());
    sql.push_str(") DO UPDATE SET ");
    let changed = columns.iter().filter(|c| c.unquoted() != id.unquoted());
    for (n, column) in changed.enumerate() {
        if n > 0 {
            sql.push_str(", ");
        }
        push_quoted(&mut sql, column.unquoted());
        sql.push_str(" = excluded.");
        push_quoted(&mut sql, column.unquoted());
    }
    Ok(sql)
}

/// The table's `id` column, which [`update_by_id`] matches rows on.
fn id_column<A: ActiveModelTrait>() -> Result<<A::Entity as EntityTrait>::Column, DbErr> {
    <A::Entity as EntityTrait>::Column::iter()
        .find(|column| column.unquoted() == "id")
        .ok_or_else(|| DbErr::Custom("update_by_id: the table has no id column".to_owned()))
}

/// The `id`s of `rows`, as the JSON text [`update_by_id_sql`] looks them up by.
fn ids_of_rows<A: ActiveModelTrait>(rows: &[A]) -> Result<Value, DbErr> {
    let id = id_column::<A>()?;
    json_array(
        rows.iter().map(|row| row.get(id).into_value()).map(|id| {
            id.ok_or_else(|| DbErr::Custom("update_by_id: a row without its id".to_owned()))
        }),
        DbBackend::Postgres,
    )
}

/// `UPDATE` of the rows of the JSON parameter `parameter` (`$n`), matched on `id` (their ids
/// also in the parameter `ids`, [`ids_of_rows`]): every column of `columns` but `id` written.
fn update_by_id_sql<A: ActiveModelTrait>(
    columns: &Columns<A>,
    parameter: &str,
    ids: &str,
) -> String {
    let changed: Vec<_> = columns
        .iter()
        .copied()
        .filter(|c| c.unquoted() != "id")
        .collect();
    let table = quoted(A::Entity::default().table_name());
    // `id = ANY(array)`, the array of the parameter's ids computed before the rest of the
    // statement: joined with a set-returning function alone, a table is read whole (the planner
    // assumes the function returns 100 rows and prefers a hash join over a sequential scan: 3.8
    // ms for two rows of a 20,000-row table, `EXPLAIN ANALYZE`); with the array it looks the rows
    // up by their primary key (0.3 ms), however the plan is cached.
    format!(
        "UPDATE {table} SET ({}) = ROW({}) FROM jsonb_populate_recordset(NULL::{table}, {parameter}::jsonb) AS row_ \
         WHERE {table}.\"id\" = row_.\"id\" AND {table}.\"id\" = \
         ANY(ARRAY(SELECT jsonb_array_elements_text({ids}::jsonb)::bigint))",
        column_list(&changed, ""),
        column_list(&changed, "row_."),
    )
}

/// PostgreSQL: several writes to several tables as one statement, one round trip, each write a
/// data-modifying part of its `WITH` (intake's batch: six statements became one; see
/// docs/benchmarks.md, "Sixth round").
///
/// Rows inserted here get their ids before the statement writes them: each table's ids are
/// drawn from its own sequence, in the order of its rows, into an array computed once. So the
/// ids follow the order of the rows by construction (the order of a history, and of an entity's
/// outbox events, is the order of their ids), and a row can refer to a row inserted by an
/// earlier part of the same statement through [`Combined::new_row`] instead of waiting for its
/// id to come back. Foreign keys are checked at the end of the statement, when every part has
/// written. Each table may be inserted into once per statement; parts without rows are left out.
#[derive(Default)]
pub struct Combined {
    parts: Vec<String>,
    parameters: Vec<Value>,
    /// Tables inserted into so far: what a later part may refer to.
    inserted: Vec<String>,
}

impl Combined {
    /// The value that stands, in a reference column listed in [`Combined::insert`]'s
    /// `references`, for the `n`th row (from 0) of the table inserted earlier in this statement.
    /// Negative: no row of ours has a negative id.
    pub fn new_row(n: usize) -> i64 {
        -i64::try_from(n).unwrap_or(i64::MAX - 1) - 1
    }

    fn parameter(&mut self, value: Value) -> String {
        self.parameters.push(value);
        format!("${}", self.parameters.len())
    }

    /// Inserts `rows`, with ids drawn from the table's sequence in their order. In each column of
    /// `references`, a value made by [`Combined::new_row`] becomes the id of that row of the
    /// table named beside it, which an earlier part of this statement inserts; other values
    /// stay as they are.
    pub fn insert<A>(
        &mut self,
        rows: Vec<A>,
        references: &[(<A::Entity as EntityTrait>::Column, &str)],
    ) -> Result<(), DbErr>
    where
        A: ActiveModelTrait,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let table_name = A::Entity::default().table_name().to_owned();
        if self.inserted.contains(&table_name) {
            return Err(DbErr::Custom(format!(
                "combined statement: {table_name} inserted into twice"
            )));
        }
        let count = self.parameter(Value::BigInt(Some(rows.len() as i64)));
        let (columns, parameter) = as_json_rows(rows, DbBackend::Postgres)?;
        let parameter = self.parameter(parameter);
        let table = quoted(&table_name);
        let columns: Vec<_> = columns
            .into_iter()
            .filter(|c| c.unquoted() != "id")
            .collect();
        // Written into one string: a batch builds this for every table, each time.
        let mut values = String::with_capacity(columns.len() * 32);
        for (n, column) in columns.iter().enumerate() {
            if n > 0 {
                values.push_str(", ");
            }
            let mut value = String::with_capacity(column.unquoted().len() + 8);
            value.push_str("row_.");
            push_quoted(&mut value, column.unquoted());
            let target = references
                .iter()
                .find(|(c, _)| c.unquoted() == column.unquoted())
                .map(|(_, target)| *target)
                .filter(|target| self.inserted.iter().any(|t| t == target));
            match target {
                Some(target) => values.push_str(&format!(
                    "CASE WHEN {value} < 0 THEN (SELECT ids[(-{value})::int] FROM {}) ELSE {value} END",
                    ids_of(target)
                )),
                // No new rows of the target in this statement: every value is an existing row's
                // id (a stray `new_row` fails the foreign key, loudly).
                None => values.push_str(&value),
            }
        }
        self.parts.push(format!(
            "{ids} AS MATERIALIZED (SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('{table}', 'id')::regclass) \
             FROM generate_series(1, {count})) AS ids)",
            ids = ids_of(&table_name),
        ));
        self.parts.push(format!(
            "{} AS (INSERT INTO {table} (\"id\", {}) SELECT (SELECT ids[row_.ordinality::int] FROM {}), {} \
             FROM jsonb_populate_recordset(NULL::{table}, {parameter}::jsonb) WITH ORDINALITY AS row_)",
            quoted(&format!("insert_{table_name}")),
            column_list(&columns, ""),
            ids_of(&table_name),
            values,
        ));
        self.inserted.push(table_name);
        Ok(())
    }

    /// Existing rows replaced by `rows`, as [`update_by_id`].
    pub fn update_by_id<A>(&mut self, rows: Vec<A>) -> Result<(), DbErr>
    where
        A: ActiveModelTrait,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let ids = ids_of_rows(&rows)?;
        let ids = self.parameter(ids);
        let (columns, parameter) = as_json_rows(rows, DbBackend::Postgres)?;
        let parameter = self.parameter(parameter);
        let name = quoted(&format!(
            "update_{}_{}",
            A::Entity::default().table_name(),
            self.parts.len()
        ));
        self.parts.push(format!(
            "{name} AS ({})",
            update_by_id_sql::<A>(&columns, &parameter, &ids)
        ));
        Ok(())
    }

    /// A data-modifying statement of the caller's: `sql` is given the placeholders of
    /// `parameters`, in their order.
    pub fn statement(&mut self, parameters: Vec<Value>, sql: impl FnOnce(&[String]) -> String) {
        let placeholders: Vec<String> = parameters
            .into_iter()
            .map(|value| self.parameter(value))
            .collect();
        let name = format!("\"statement_{}\"", self.parts.len());
        self.parts
            .push(format!("{name} AS ({})", sql(&placeholders)));
    }

    /// Runs every part, in one statement (nothing when there is none).
    pub async fn execute(self, db: &impl ConnectionTrait) -> Result<(), DbErr> {
        if self.parts.is_empty() {
            return Ok(());
        }
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("WITH {} SELECT 1", self.parts.join(",\n")),
            self.parameters,
        ))
        .await?;
        Ok(())
    }
}

/// The name of the part that holds the new ids of `table`'s rows.
fn ids_of(table: &str) -> String {
    quoted(&format!("ids_{table}"))
}

/// The columns the first row sets, and every row as a JSON object keyed by those columns' names,
/// all in one JSON array, as text: the single parameter of the statements above. The values are
/// taken out of the rows and written as `backend` reads them back ([`write_value`]).
fn as_json_rows<A: ActiveModelTrait>(
    rows: Vec<A>,
    backend: DbBackend,
) -> Result<(Columns<A>, Value), DbErr> {
    let columns: Columns<A> = <A::Entity as EntityTrait>::Column::iter()
        .filter(|column| rows.first().is_some_and(|row| !row.is_not_set(*column)))
        .collect();
    let mut text = Vec::with_capacity(rows.len() * 1024);
    text.push(b'[');
    for (n, mut row) in rows.into_iter().enumerate() {
        if n > 0 {
            text.push(b',');
        }
        text.push(b'{');
        for (c, column) in columns.iter().enumerate() {
            let value = row.take(*column).into_value().ok_or_else(|| {
                DbErr::Custom(format!(
                    "bulk statement on {}: column {} set in the first row only",
                    A::Entity::default().table_name(),
                    column.unquoted()
                ))
            })?;
            if c > 0 {
                text.push(b',');
            }
            write_json(&mut text, &column.unquoted())?;
            text.push(b':');
            write_value(&mut text, &value, backend)?;
        }
        text.push(b'}');
    }
    text.push(b']');
    Ok((columns, json_text(text)?))
}

type Columns<A> = Vec<<<A as ActiveModelTrait>::Entity as EntityTrait>::Column>;

/// `"a", "b"`, each name after `prefix`. Written into one string: intake builds these for every
/// table of every batch (an allocation per column made them a tenth of its allocations).
fn column_list<C: Iden>(columns: &[C], prefix: &str) -> String {
    let mut list = String::with_capacity(columns.len() * (prefix.len() + 24));
    for (n, column) in columns.iter().enumerate() {
        if n > 0 {
            list.push_str(", ");
        }
        list.push_str(prefix);
        push_quoted(&mut list, column.unquoted());
    }
    list
}

/// The element type `one_of` casts its values to on PostgreSQL.
#[derive(Debug, Clone, Copy)]
pub enum Elements {
    BigInt,
    Text,
    Uuid,
}

/// `column IN (values)`, written as one fixed text whatever the number of values (see the module
/// documentation).
pub fn one_of<C, V>(backend: DbBackend, column: C, elements: Elements, values: V) -> SimpleExpr
where
    C: ColumnTrait,
    V: IntoIterator,
    V::Item: Into<Value>,
{
    membership(backend, column, elements, values, true)
}

/// `column NOT IN (values)`, one fixed text likewise, for a column that is never NULL. Not
/// `one_of(..).not()`: on PostgreSQL that is `NOT (column = ANY(array))`, which compares each row
/// with every element in turn, while `NOT IN (SELECT ...)` is looked up in a hash of the values
/// (the relay's window passing over 2,000 busy entities: 65 ms against 6.5 ms).
pub fn none_of<C, V>(backend: DbBackend, column: C, elements: Elements, values: V) -> SimpleExpr
where
    C: ColumnTrait,
    V: IntoIterator,
    V::Item: Into<Value>,
{
    membership(backend, column, elements, values, false)
}

fn membership<C, V>(
    backend: DbBackend,
    column: C,
    elements: Elements,
    values: V,
    member: bool,
) -> SimpleExpr
where
    C: ColumnTrait,
    V: IntoIterator,
    V::Item: Into<Value>,
{
    let array = match json_array(values.into_iter().map(Into::into).map(Ok), backend) {
        Ok(array) => array,
        // A value of a type no caller passes: the condition then matches nothing, loudly.
        Err(error) => {
            tracing::error!(%error, "one_of/none_of: a value that cannot be written as JSON");
            if !member {
                return Expr::cust("FALSE");
            }
            Value::String(Some("[]".to_owned()))
        }
    };
    let name = format!(
        "{}.{}",
        quoted(C::EntityName::default().table_name()),
        quoted(column.unquoted())
    );
    if backend != DbBackend::Postgres {
        let element = match elements {
            Elements::Uuid => "unhex(value)",
            Elements::BigInt | Elements::Text => "value",
        };
        let operator = if member { "IN" } else { "NOT IN" };
        return Expr::cust_with_values(
            format!("{name} {operator} (SELECT {element} FROM json_each(?))"),
            [array],
        );
    }
    let cast = match elements {
        Elements::BigInt => "bigint",
        Elements::Text => "text",
        Elements::Uuid => "uuid",
    };
    let sql = if member {
        format!("{name} = ANY(ARRAY(SELECT jsonb_array_elements_text($1::jsonb)::{cast}))")
    } else {
        format!("{name} NOT IN (SELECT jsonb_array_elements_text($1::jsonb)::{cast})")
    };
    Expr::cust_with_values(sql, [array])
}

/// `values` as the text of one JSON array ([`write_value`] each).
fn json_array(
    values: impl Iterator<Item = Result<Value, DbErr>>,
    backend: DbBackend,
) -> Result<Value, DbErr> {
    let mut text = vec![b'['];
    for (n, value) in values.enumerate() {
        if n > 0 {
            text.push(b',');
        }
        write_value(&mut text, &value?, backend)?;
    }
    text.push(b']');
    json_text(text)
}

/// The JSON text written by the functions above, as a text parameter (cast by the statement).
fn json_text(text: Vec<u8>) -> Result<Value, DbErr> {
    String::from_utf8(text)
        .map(|text| Value::String(Some(text)))
        .map_err(|error| DbErr::Custom(format!("bulk statement: JSON not UTF-8: {error}")))
}

/// A value as the statements above read it back into its column:
/// - PostgreSQL (`jsonb_populate_recordset`, casts): timestamps as RFC 3339 with microseconds
///   (what PostgreSQL keeps, truncated as sqlx's binary encoding does), UUIDs as text, JSON as
///   itself;
/// - SQLite (`->>`, which gives a JSON string as text, a number as a number, `true` as 1): what
///   sqlx binds, so that the same bytes are stored: timestamps as sqlx's text
///   (`to_rfc3339_opts(AutoSi, false)`), JSON as the text of the document, UUIDs as 32 hex
///   digits for `unhex` (sqlx binds the 16 bytes).
///
/// NULL for none.
fn write_value(out: &mut Vec<u8>, value: &Value, backend: DbBackend) -> Result<(), DbErr> {
    if backend != DbBackend::Postgres {
        match value {
            Value::Uuid(v) => {
                let mut hex = [0u8; 32];
                return write_json(
                    out,
                    &v.as_ref().map(|id| &*id.simple().encode_lower(&mut hex)),
                );
            }
            Value::ChronoDateTimeUtc(v) => {
                return write_json(
                    out,
                    &v.map(|at| at.to_rfc3339_opts(SecondsFormat::AutoSi, false)),
                );
            }
            Value::ChronoDateTimeWithTimeZone(v) => {
                return write_json(
                    out,
                    &v.map(|at| at.to_rfc3339_opts(SecondsFormat::AutoSi, false)),
                );
            }
            Value::Json(v) => {
                let text = v
                    .as_deref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|error| {
                        DbErr::Custom(format!("bulk statement: a JSON value as text: {error}"))
                    })?;
                return write_json(out, &text);
            }
            _ => {}
        }
    }
    match value {
        Value::Bool(v) => write_json(out, v),
        Value::TinyInt(v) => write_json(out, v),
        Value::SmallInt(v) => write_json(out, v),
        Value::Int(v) => write_json(out, v),
        Value::BigInt(v) => write_json(out, v),
        Value::TinyUnsigned(v) => write_json(out, v),
        Value::SmallUnsigned(v) => write_json(out, v),
        Value::Unsigned(v) => write_json(out, v),
        Value::BigUnsigned(v) => write_json(out, v),
        Value::String(v) => write_json(out, v),
        Value::Json(v) => write_json(out, v),
        Value::Uuid(v) => write_json(out, v),
        Value::ChronoDateTimeUtc(v) => write_json(
            out,
            &v.map(|at| at.to_rfc3339_opts(SecondsFormat::Micros, true)),
        ),
        Value::ChronoDateTimeWithTimeZone(v) => write_json(
            out,
            &v.map(|at| at.to_rfc3339_opts(SecondsFormat::Micros, true)),
        ),
        other => Err(DbErr::Custom(format!(
            "a value of a type the bulk statements do not carry: {other:?}"
        ))),
    }
}

fn write_json(out: &mut Vec<u8>, value: &impl serde::Serialize) -> Result<(), DbErr> {
    serde_json::to_writer(out, value)
        .map_err(|error| DbErr::Custom(format!("bulk statement: a value as JSON: {error}")))
}

fn quoted(identifier: &str) -> String {
    let mut text = String::with_capacity(identifier.len() + 2);
    push_quoted(&mut text, identifier);
    text
}

/// `identifier` as a quoted SQL identifier (`"` doubled inside), after `out`.
fn push_quoted(out: &mut String, identifier: &str) {
    out.reserve(identifier.len() + 2);
    out.push('"');
    if identifier.contains('"') {
        out.push_str(&identifier.replace('"', "\"\""));
    } else {
        out.push_str(identifier);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    /// A value as the bulk statements write it, read back.
    fn json_of(value: Value) -> Result<Json, DbErr> {
        let mut text = Vec::new();
        write_value(&mut text, &value, DbBackend::Postgres)?;
        Ok(serde_json::from_slice(&text).expect("valid JSON"))
    }

    #[test]
    fn rows_become_one_json_text_of_the_columns_the_first_row_sets() {
        let rows = vec![kci_row(uuid::Uuid::nil()), kci_row(uuid::Uuid::max())];
        let (columns, parameter) = as_json_rows(rows, DbBackend::Postgres).unwrap();
        let names: Vec<_> = columns.iter().map(|c| c.unquoted()).collect();
        assert_eq!(names, ["kci_id", "tracked_entity_id"]);
        let Value::String(Some(text)) = parameter else {
            panic!("not a text parameter: {parameter:?}")
        };
        assert_eq!(
            serde_json::from_str::<Json>(&text).unwrap(),
            serde_json::json!([
                {"kci_id": "00000000-0000-0000-0000-000000000000", "tracked_entity_id": 7},
                {"kci_id": "ffffffff-ffff-ffff-ffff-ffffffffffff", "tracked_entity_id": 7},
            ])
        );
        let unset_later = vec![kci_row(uuid::Uuid::nil()), Default::default()];
        assert!(
            as_json_rows::<entity::kci::ActiveModel>(unset_later, DbBackend::Postgres).is_err()
        );
    }

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

    fn kci_row(kci_id: uuid::Uuid) -> entity::kci::ActiveModel {
        entity::kci::ActiveModel {
            kci_id: sea_orm::Set(kci_id),
            tracked_entity_id: sea_orm::Set(7),
            ..Default::default()
        }
    }

    fn event_row(kci_ref: i64) -> entity::outbox_event::ActiveModel {
        entity::outbox_event::ActiveModel {
            kci_ref: sea_orm::Set(kci_ref),
            tracked_entity_id: sea_orm::Set(7),
            ..Default::default()
        }
    }

    #[test]
    fn a_combined_statement_numbers_its_parameters_in_order_and_resolves_references_to_new_rows() {
        let mut statement = Combined::default();
        statement
            .insert(vec![kci_row(uuid::Uuid::nil())], &[])
            .unwrap();
        statement
            .insert(
                vec![event_row(Combined::new_row(0)), event_row(41)],
                &[(entity::outbox_event::Column::KciRef, "kci")],
            )
            .unwrap();
        let sql = statement.parts.join("\n");
        // Each insert: its row count, then its rows.
        assert_eq!(statement.parameters.len(), 4);
        assert!(sql.contains("generate_series(1, $1)"), "{sql}");
        assert!(
            sql.contains("jsonb_populate_recordset(NULL::\"kci\", $2::jsonb)"),
            "{sql}"
        );
        assert!(
            sql.contains("jsonb_populate_recordset(NULL::\"outbox_event\", $4::jsonb)"),
            "{sql}"
        );
        assert!(
            sql.contains("CASE WHEN row_.\"kci_ref\" < 0 THEN (SELECT ids[(-row_.\"kci_ref\")::int] FROM \"ids_kci\")"),
            "{sql}"
        );
        assert_eq!(Combined::new_row(0), -1);
        assert_eq!(Combined::new_row(9), -10);
    }

    #[test]
    fn a_combined_statement_refuses_a_table_twice_and_leaves_references_to_tables_it_does_not_insert()
     {
        let mut statement = Combined::default();
        statement
            .insert(
                vec![event_row(41)],
                &[(entity::outbox_event::Column::KciRef, "kci")],
            )
            .unwrap();
        assert!(!statement.parts.join("\n").contains("CASE WHEN"));
        let twice = statement.insert(vec![event_row(42)], &[]);
        assert!(matches!(twice, Err(DbErr::Custom(message)) if message.contains("twice")));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quoted("kci"), "\"kci\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
